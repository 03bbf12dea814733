"""mnist_lit: the seed project's two-stage MNIST pipeline as a PyTorch Lightning project.

idx (the IDX files) - data (MNISTDataModule) - net (LeNet, SlimNet, WideNet) - module (MNISTLitModule: the model
with its input normalisation, the training step) - cli (scripts/train.py: LightningCLI, the runs) - evaluate,
predict, export, inference (using trained models, ensembles) - experiments (sweeps, searches, the runs table).
"""
