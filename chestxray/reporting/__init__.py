"""Renderers of results: the evaluation files and plots (metrics_report), the printable PDF (pdf), DICOM Secondary
Capture and Comprehensive SR (dicom), and how names and numbers are written everywhere (formatting).

They show what the core decided (chestxray.predictor, chestxray.metrics) and never re-decide a call. Nothing is
imported here, so using one renderer does not load the others' libraries (matplotlib, highdicom).
"""
