"""Synthetic copy-detection sets (paper Table 1), one job per module:

- ``builder``: the contract a kind implements (:class:`~datamodules.synthetic.builder.SyntheticBuilder`)
  and the types it returns;
- ``build``: the engine that builds, reuses and resumes a set on disk (``build_synthetic``);
- ``manifest``: the on-disk form (manifest, header, folder claim);
- ``workers``: build workers that die with the build;
- ``sampling``: seeded draws; ``sources``: source refs and the query / pool split;
- ``datamodule``: the base datamodule that builds a set and reads it back;
- the kinds: ``segmix`` (with its ``masks``), ``cutmix``, ``outpainting`` (Patch, Diagonal).
"""
