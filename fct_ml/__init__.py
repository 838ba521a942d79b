"""fct_ml: forward-compatible embedding training (FCT), BCT and FastFill as a pure library.

No orchestrator, no database (torch, torchvision, numpy, PIL, scikit-learn's bundled digits,
safetensors, tqdm). One file per concept:

    datasets.py        the dataset registry: loaders, default class splits, augmentation policies
    data.py            datasets, class splits, IDX/CIFAR/image-folder loaders
    augment.py         batched tensor augmentation
    augmented.py       a generated gallery of any size from the training images (scale checks)
    backbones.py       the backbone registry
    models.py          EmbeddingModel (non-negative embedding, bias-free classifier)
    side_info.py       the SimCLR side-info model psi
    transformation.py  h(old_embedding, side_info), FastFill's sigma head, the features h is trained on
    bct.py             the BCT baseline
    losses.py          every loss, returning named parts
    training.py        the one training loop, device policy, seeding, frozen encoders
    trainers.py        one trainer per model: its objective through the one training loop
    retrieval.py       CMC top-k and mAP in bounded memory
    backfill.py        applying h to stored vectors; backfilling curves and their area
    evaluation.py      the paper's cases (query/gallery pairs) and the gap closed
    checkpoint.py      safetensors checkpoints with sha256, content digests, space ids
    external.py        models from outside: checkpoint and TorchScript files, checked on a probe
    torchscript.py     a TorchScript embedding model kept as its archive's bytes and preprocessing
    presets.py         the experiment configurations (tiny, demo, cpu, ..., paper)
    pipeline.py        the stages that train and connect the models (reproduce and the assets)
    reproduce.py       the paper's experiment end to end
    chain.py           two upgrades in a row (old -> v2 -> v3) with the pipeline's stages
    progress.py        stage progress and an overall ETA for `fct reproduce`
    cli.py             `fct reproduce`
    config.py          typed, closed configuration from dicts
"""

__version__ = "0.1.0"
