"""
@article{Lei2021,
  author    = {Lei, Houchao and Yang, Yang},
  title     = {CDAE: A Cascade of Denoising Autoencoders for Noise Reduction in the Clustering of Single-Particle Cryo-EM Images},
  journal   = {Frontiers in Genetics},
  volume    = {11},
  pages     = {627746},
  year      = {2021},
  doi       = {10.3389/fgene.2020.627746},
  url       = {https://doi.org/10.3389/fgene.2020.627746}
}
"""
# BibTeX of the references cited by the Scipion plugin: pyworkflow parses this module's docstring
# (``cdae_em.bibtex``, found because ``cdae_em`` is the plugin module). Nothing else here.
