"""Benchmarks of the library: speed and accuracy, against torchvision where it has a peer."""
