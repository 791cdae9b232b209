"""The weight initialisation shared by the official SSD4Rec, Mamba4Rec and TiM4Rec code.

It is RecBole SASRec's: normal(0, 0.02) for every Linear and Embedding weight, zero
biases, LayerNorm weight 1 and bias 0. Applied with ``model.apply(sasrec_init)``, it
also reaches the Linear layers inside the SSM blocks, as in those codes; convolutions
and the SSM parameters (A_log, D, dt_bias) keep their own init.
"""

from torch import nn


def sasrec_init(module, std=0.02):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
