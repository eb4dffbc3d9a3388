"""Causal LMs as moekd sees any of them: loading and saving from local directories (`loading`), what identifies
a model and its tokenizer (`identity`: the one `model_identity`, compared by `content`), log-probs from hidden
states at target positions (`logprobs`), and the interface of every backend that runs a model (`backend`).

May import core.
"""
