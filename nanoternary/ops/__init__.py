"""The operations of the model, one forward/backward pair each, written by hand in NumPy.

Reading order: norm.py (RMSNorm), ternary.py (the {-1, 0, +1} linear layer), conv.py (the causal
dilated grouped convolution), gates.py (the sigmoid gate and the squared-ReLU GLU), embedding.py,
head.py (the 50,257-way softmax cross-entropy), hier_head.py (the two-level softmax),
adaptive_head.py (the adaptive softmax: a shortlist and narrower tail clusters).

Shape letters used in every file:
    B batch, T time (sequence length), N = B*T rows, C model width (d_model),
    H GLU hidden width, V vocabulary, K kernel size, G groups, D dilation.

Conventions (llm.c's doc/layernorm/layernorm.py):
    y, cache = op_forward(x, w, ...)       # cache: a tuple of exactly what the backward needs
    dx, dw = op_backward(dy, cache)        # gradients in the order of the forward's inputs
Gradients are returned, never stored. Every op works in any float dtype (float32 for training,
float64 for the finite-difference checks in tests/).
"""
