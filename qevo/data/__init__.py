"""Data: the stored datasets and a user's own arrays as one :class:`~qevo.data.datasets.Dataset`
(device-resident uint8 splits, normalisation, augmentation), and ``python -m qevo.data``, which
writes a dataset as an image-folder archive."""
