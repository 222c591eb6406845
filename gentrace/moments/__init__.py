"""Per-sample gradient moments without materializing every per-sample gradient (SPEC section 4).

For every parameter q and a sample set S: sum_i g_iq, sum_i g_iq^2, #{g_iq > 0}, #{g_iq < 0},
where g_i is the gradient of sample i's loss alone. One small module per layer type computes
them from the layer's input `a` and the per-sample output gradient `delta` (BackPACK's design):
`linear.py` (GEMMs), `conv.py` (unfolded inputs, chunked), `batchnorm.py`, `layernorm.py` (closed
form), `attention.py` (nn.MultiheadAttention, out_proj included), `fallback.py` (torch.func vmap over
grad, chunked) for every other owner, `composite.py` for parameters a module with children uses in
its own forward (a class token). `ownership.py` says which module owns which parameter and refuses
weight tying; `engine.py` wires them to a model by hooks.
"""
