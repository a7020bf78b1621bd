"""Knowledge transfer between models with different tokenizers (FedMKT): vocabulary mapping, sequence
alignment, distribution mapping and selection. Pure functions on tokenizers and tensors; no transport."""
