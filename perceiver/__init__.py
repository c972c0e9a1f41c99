"""Percival's model core: a Perceiver IO encoder-decoder over packed sets of elements.

Needs torch, numpy and safetensors only. Three slots: the *input* (:class:`ElementEncoding`: element ->
token), the *query provider* (:mod:`perceiver.queries`: any packed (time, channel, coord) -- held-out
elements, a grid, another modality) and the *output head*
(:mod:`perceiver.heads`: decoded query -> prediction + loss; :func:`register_head`). A checkpoint carries its
:class:`DataContract` (channel vocabulary and normalisation, time / coord scales).

    import torch
    import perceiver
    contract = perceiver.DataContract(channels=[perceiver.ChannelSpec("HR", "vitals"),
                                                perceiver.ChannelSpec("Lactate", "labs")],
                                      modalities=["vitals", "labs"])
    model = perceiver.Percival(perceiver.ModelConfig.preset("tiny", contract=contract))
    batch = perceiver.PackedBatch.from_elements(time=torch.tensor([0., 1., 2.]), channel=torch.tensor([0, 1, 0]),
                                                value=torch.randn(3), counts=[3])
    out = model(batch)                 # out.mean, out.log_sigma: one per target element
    model.loss(batch, out).backward()
"""

from perceiver.checkpoint import load, save
from perceiver.config import DecoderConfig, HeadConfig, InputConfig, ModelConfig, Sizes
from perceiver.contract import ChannelSpec, DataContract
from perceiver.encodings import ElementEncoding
from perceiver.heads import HEADS, HeadOutput, OutputHead, register_head
from perceiver.metrics import Metrics
from perceiver.model import Encoded, ModelOutput, Percival
from perceiver.packing import PackedBatch
from perceiver.queries import Prediction, Queries, predict

__all__ = ["HEADS", "ChannelSpec", "DataContract", "DecoderConfig", "ElementEncoding", "Encoded", "HeadConfig",
           "HeadOutput", "InputConfig", "Metrics", "ModelConfig", "ModelOutput", "OutputHead", "PackedBatch",
           "Percival", "Prediction", "Queries", "Sizes", "load", "predict", "register_head", "save"]
