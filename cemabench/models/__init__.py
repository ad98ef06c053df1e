"""Models by name (the ``cemabench.models`` entry points: ``mini:``, ``tiny:``, ``torchvision:``, ``timm:``,
``cifar:``, ``robustbench:``), each taking images in [0, 1], and split models for collaborative inference.

- :mod:`.zoo`: torchvision, timm and tiny models, the weights folder;
- :mod:`.cifar`, :mod:`.robustbench`: the CIFAR ResNets and RobustBench's models;
- :mod:`.mini`: the embedded miniature's two networks and their weights;
- :mod:`.layers`: input normalisation inside a model;
- :mod:`.split`: cutting a model at a named stage; each zoo registers the layouts of the families it builds;
- :mod:`.builder`: every table's models built by name, and under ``--isolate`` a model plugin's in a process of its
  own.
"""
