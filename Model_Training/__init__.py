"""Training and evaluation scripts (run them as files: python Model_Training/train.py --help)."""
