"""The models of bench/model_vs_peers.py at one shared shape, each as ``(model, step)``: ``step(autocast)`` runs
one training step's forward and backward (the caller clears the gradients).

The shape: batch 8, ``n`` input elements of 64 channels, 256 latents x 256, 8 self-attention heads, 1
cross-attention, 6 latent self-attention layers, 512 output queries.
"""

from __future__ import annotations

SIZES = (2048, 8192)
BATCH, CHANNELS, QUERIES = 8, 64, 512


def percival_case(n: int, default_decoder: bool = False):
    """Percival at the peer shape: the ``bench`` preset (a pure Perceiver IO decoder, as the peers have), or
    with ``default_decoder`` the shipped decoder (neighbour and snapshot features, bounded local attention)."""
    import torch

    from perceiver.config import ModelConfig
    from perceiver.contract import ChannelSpec, DataContract
    from perceiver.model import Percival
    from perceiver.packing import PackedBatch

    decoder = dict(decoder_local_heads=4, decoder_neighbours=True, decoder_snapshot=True) if default_decoder else {}
    contract = DataContract(channels=[ChannelSpec(f"c{i}", "ab"[i % 2]) for i in range(CHANNELS)],
                            modalities=["a", "b"], time_min_period=0.01, time_max_period=200.0,
                            coord_min_period=1.0, coord_max_period=2000.0, coord_center=500.0, coord_scale=500.0)
    model = Percival(ModelConfig.preset("bench", **decoder, contract=contract)).train()
    g = torch.Generator().manual_seed(0)
    per = n + QUERIES
    total = BATCH * per
    visible = torch.zeros(BATCH, per, dtype=torch.bool)
    visible[:, :n] = True
    visible = visible.reshape(-1)
    channel = torch.randint(0, CHANNELS, (total,), generator=g)
    batch = PackedBatch(offsets=torch.arange(BATCH + 1) * per, time=torch.rand(total, generator=g) * 100,
                        channel=channel, modality=model.encoding.channel_modality[channel],
                        value=torch.randn(total, generator=g), error=torch.rand(total, generator=g) * 0.1,
                        coord=torch.rand(total, generator=g) * 1000, visible=visible, target=~visible,
                        record_index=torch.arange(BATCH), element_index=torch.arange(total),
                        t_ref=torch.zeros(BATCH, dtype=torch.float64))

    def step(autocast):
        with autocast:
            out = model(batch)
        value = model.loss(batch, out)
        value.backward()
        return value

    return model, step


def hf_case(n: int, dropout: float = 0.1):
    """Hugging Face ``PerceiverModel`` with a basic decoder of trainable query positions; MSE loss."""
    import torch
    from transformers import PerceiverConfig, PerceiverModel
    from transformers.models.perceiver.modeling_perceiver import PerceiverBasicDecoder

    config = PerceiverConfig(num_latents=256, d_latents=256, d_model=CHANNELS, num_blocks=1,
                             num_self_attends_per_block=6, num_self_attention_heads=8,
                             num_cross_attention_heads=8, self_attention_widening_factor=4,
                             cross_attention_widening_factor=1, attention_probs_dropout_prob=dropout)
    decoder = PerceiverBasicDecoder(
        config, output_num_channels=2, output_index_dims=QUERIES, num_channels=256, num_heads=8,
        position_encoding_type="trainable",
        trainable_position_encoding_kwargs=dict(num_channels=256, index_dims=QUERIES))
    torch.manual_seed(0)
    model = PerceiverModel(config, decoder=decoder).train()
    x = torch.randn(BATCH, n, CHANNELS, generator=torch.Generator().manual_seed(0))
    target = torch.randn(BATCH, QUERIES, 2, generator=torch.Generator().manual_seed(1))

    def step(autocast):
        with autocast:
            out = model(inputs=x).logits
        value = (out.float() - target).square().mean()
        value.backward()
        return value

    return model, step


def lucidrains_case(n: int):
    """lucidrains ``perceiver_pytorch.PerceiverIO`` with given queries; MSE loss."""
    import torch
    from perceiver_pytorch import PerceiverIO

    torch.manual_seed(0)
    model = PerceiverIO(dim=CHANNELS, queries_dim=128, logits_dim=2, depth=6, num_latents=256, latent_dim=256,
                        cross_heads=1, latent_heads=8, cross_dim_head=64, latent_dim_head=32,
                        decoder_ff=False).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, n, CHANNELS, generator=g)
    queries = torch.randn(BATCH, QUERIES, 128, generator=g)
    target = torch.randn(BATCH, QUERIES, 2, generator=g)

    def step(autocast):
        with autocast:
            out = model(x, queries=queries)
        value = (out.float() - target).square().mean()
        value.backward()
        return value

    return model, step


CASES = {"percival": percival_case, "percival-default": lambda n: percival_case(n, True), "hf": hf_case,
         "hf-nodrop": lambda n: hf_case(n, 0.0),
         "lucidrains": lucidrains_case}
