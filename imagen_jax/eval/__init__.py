"""Evaluation: Inception FID (`fid`, `inception`), its weights (`weights`), and readers of
PyTorch checkpoint files without torch (`torch_files`)."""
