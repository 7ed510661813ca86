"""Modelling: MNIST data, CNN training and batched prediction for any digit image.

Modules (import what you need; importing this package imports nothing heavy, and only
``Predictor.load``/``train_cnn`` import TensorFlow):

- ``errors`` — the typed error tree (``ImageError`` for one bad input, ``ModelLoadError`` …);
- ``preprocessing`` — bytes/arrays of any format, size or colours → the 28x28 model input;
- ``data_preparation`` — offline MNIST loading and the stratified split;
- ``predict_cnn`` — ``Predictor``: compiled batched prediction, and the prediction CLI;
- ``train_cnn`` — the training CLI writing checkpoint, metrics and plots.

This package knows images and the model only — nothing of brokers, queues or databases.
"""
