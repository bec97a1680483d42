"""Stand-in for google.colab (see tests/platforms/README.md): the submodules the runner notebook uses."""
