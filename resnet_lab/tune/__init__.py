"""The Ray glue: the only package that imports ray. Import `resnet_lab.tune.runner` to run a sweep."""
