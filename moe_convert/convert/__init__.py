"""Dense -> PR-MoE upcycling, export to inference layouts, the way back from DeepSpeed, and inspect."""
