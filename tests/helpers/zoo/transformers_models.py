"""Zoo architectures from Hugging Face `transformers`, built from tiny configs with
random weights (no hub access): vision CNNs (BN, GN with weight standardisation,
channel-first LN), vision and text encoders (LN), decoder LLMs (RMSNorm in the
spellings of Llama, Mistral, Qwen2, Qwen3 with q/k norms, Gemma's (1 + w)), the T5
encoder (variance without mean) and the audio front ends of wav2vec2 and Whisper."""

from __future__ import annotations

import torch

from .registry import Architecture, FirstOutput, half_precision, image, randomize, seeded, tokens

VOCAB = 128
LLM = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, use_cache=False)


def _wrap(model, *args, **kwargs):
    torch.manual_seed(0)
    return FirstOutput(randomize(model), **kwargs).eval(), args


def _model(cls_name: str, config_name: str, **config):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**config)
    if hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"
    return getattr(transformers, cls_name)(config)


def bert():
    return _wrap(_model("BertModel", "BertConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64), tokens(VOCAB))


def vit():
    return _wrap(_model("ViTModel", "ViTConfig", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64), image())


def dinov2():
    return _wrap(_model("Dinov2Model", "Dinov2Config", image_size=32, patch_size=8, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, layerscale_value=0.5), image())


def swin():
    return _wrap(_model("SwinModel", "SwinConfig", image_size=32, patch_size=2, embed_dim=16, depths=[2, 2],
                        num_heads=[2, 4], window_size=4), image())


def convnext():
    return _wrap(_model("ConvNextModel", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]), image())


def resnet():
    return _wrap(_model("ResNetModel", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                        layer_type="bottleneck"), image())


def resnet_backbone():
    """ResNet as a detection backbone: feature maps of every stage."""
    model = _model("ResNetBackbone", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                   out_features=["stage1", "stage2", "stage3"])
    return _wrap(model, image(size=64))


def regnet():
    return _wrap(_model("RegNetModel", "RegNetConfig", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                        groups_width=8), image())


def levit():
    """LeViT: Linear→BatchNorm1d and Conv→BN throughout."""
    return _wrap(_model("LevitModel", "LevitConfig", image_size=64, hidden_sizes=[32, 48], num_attention_heads=[2, 3],
                        depths=[1, 1], key_dim=[8, 8], mlp_ratio=[2, 2], attention_ratio=[2, 2],
                        down_ops=[["Subsample", 8, 32 // 8, 4, 2, 2]]), image(size=64))


def bit():
    """BiT: GroupNorm and weight-standardised convs (F.batch_norm over the weight)."""
    return _wrap(_model("BitModel", "BitConfig", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                        num_groups=8, layer_type="preactivation"), image())


class CausalLM(FirstOutput):
    """Logits of a decoder LLM for a full (all-ones) attention mask, as in inference
    exports; without a mask transformers looks for packed sequences with torch.diff,
    which the TorchScript exporter cannot export."""

    def forward(self, x):
        return super().forward(x, torch.ones_like(x))


def _llm(name: str, **extra):
    def build():
        torch.manual_seed(0)
        model = _model(f"{name}ForCausalLM", f"{name}Config", **{**LLM, **extra})
        return CausalLM(randomize(model)).eval(), (tokens(VOCAB),)
    build.__name__ = name.lower()
    return build


def t5_encoder():
    return _wrap(_model("T5EncoderModel", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                        num_heads=4), tokens(VOCAB))


def wav2vec2():
    """wav2vec2 audio front end (conv feature extractor with GroupNorm) and encoder."""
    return _wrap(_model("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, feat_extract_norm="group",
                        do_stable_layer_norm=False),
                 torch.randn(1, 400, generator=seeded()))


def whisper_encoder():
    """Whisper's audio encoder: two convs over the log-mel spectrogram, then LN transformer."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, max_source_positions=16)
    config._attn_implementation = "eager"
    return _wrap(WhisperEncoder(config), torch.randn(1, 16, 32, generator=seeded()))


llama, mistral, qwen2 = _llm("Llama"), _llm("Mistral", sliding_window=None), _llm("Qwen2")
qwen3 = _llm("Qwen3", head_dim=8)
gemma = _llm("Gemma", head_dim=8)

ARCHITECTURES = [
    Architecture("bert", "transformers", ("ln",), bert),
    Architecture("vit", "transformers", ("ln",), vit),
    Architecture("dinov2", "transformers", ("ln",), dinov2),
    Architecture("swin", "transformers", ("ln",), swin),
    Architecture("convnext", "transformers", ("ln", "ln_cf"), convnext),
    Architecture("resnet", "transformers", ("bn",), resnet),
    Architecture("resnet_backbone", "transformers", ("bn",), resnet_backbone),
    Architecture("regnet", "transformers", ("bn",), regnet),
    Architecture("levit", "transformers", ("bn",), levit),
    Architecture("bit", "transformers", ("gn", "ws"), bit),
    Architecture("llama", "transformers", ("rms",), llama),
    Architecture("mistral", "transformers", ("rms",), mistral),
    Architecture("qwen2", "transformers", ("rms",), qwen2),
    Architecture("qwen3", "transformers", ("rms",), qwen3),
    Architecture("gemma", "transformers", ("rms",), gemma),
    Architecture("t5_encoder", "transformers", ("rms",), t5_encoder),
    Architecture("wav2vec2", "transformers", ("gn", "ln"), wav2vec2),
    Architecture("whisper_encoder", "transformers", ("ln",), whisper_encoder),
    Architecture("bert_fp16", "transformers", ("ln",), half_precision(bert), fp16=True),
    Architecture("llama_fp16", "transformers", ("rms",), half_precision(llama), fp16=True),
    Architecture("convnext_fp16", "transformers", ("ln", "ln_cf"), half_precision(convnext), fp16=True),
]
