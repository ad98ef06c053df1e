"""Datasets by name (the ``cemabench.datasets`` entry points): the embedded miniature, ImageNet-C/R, CIFAR-10/100(-C)
and Hugging Face datasets, each a :class:`~cemabench.data.DatasetSource` of ordered test domains and the clean data
the cloud may keep.

- :mod:`.miniature`: scikit-learn's digits under the 15 corruptions, generated and cached;
- :mod:`.corruptions`: the 15 ImageNet-C corruptions at five severities;
- :mod:`.imagenet`, :mod:`.cifar`, :mod:`.hf`: the real datasets in their published layouts.
"""
