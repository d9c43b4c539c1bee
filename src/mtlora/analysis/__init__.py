"""Analyses of trained adapters: the paper's figures as PNG + JSON (``mtlora analyze``, docs/analyze.md).

* :mod:`mtlora.analysis.routing` - routing entropy per layer (Fig. 1A), expert usage per task, fine-grained
  routing weights per task as groups x experts heatmaps (Fig. S4, and the released ``routing_weights.pt``);
* :mod:`mtlora.analysis.spectral` - singular-value spectra of the experts' B with w(σ) (Fig. S2) and the
  SV-band conflict / importance of the experts (Fig. 1B);
* :mod:`mtlora.analysis.gradients` - per-layer task-gradient cosine similarity and the component-vs-block
  comparison (Fig. S3);
* :mod:`mtlora.analysis.cli` - the ``mtlora analyze`` command.

Submodules are imported on use: this package itself imports nothing heavy.
"""
