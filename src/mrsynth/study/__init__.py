"""Perceptual (real-vs-synthetic) reader study: sampling, rendering, web app and statistics.

``mrsynth study create`` samples and pre-renders every image into one SQLite file,
``add-reader`` gives each reader a private link, ``serve`` runs the FastAPI app and
``results`` computes the statistics. See ``docs/study.md``.
"""
