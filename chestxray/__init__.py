"""Shared core of the chest X-ray tool: labels, image reading, model, checkpoint, transforms, heatmaps.

No Flask, no argparse, no printing here: training, evaluation and serving all build on this package.
"""
