"""What a saved checkpoint's remote code needs: layout, config, HF model classes, the PR-MoE layer, routing.

These files import only torch, transformers and each other (`from .x import y`), so
`save_pretrained` copies them next to the weights and the checkpoint loads with `trust_remote_code=True`
where moe_convert is not installed.
"""
