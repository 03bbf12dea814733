"""mnist_lit: the seed project's two-stage MNIST pipeline as a PyTorch Lightning project.

data (MNISTDataModule) - net (LeNet) - loss (nll_loss) - module (MNISTLitModule) - training (the runs).
"""
