"""Rank grid (``layout``: pure math and CLI), process groups (``state``) and the autograd collectives
the parallel layers are built from (``collectives``). Import from the submodules: this package imports
nothing eagerly, so that ``python -m megatron_lite.parallel.layout`` runs without torch."""
