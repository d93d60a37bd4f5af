"""Small student architectures, registered for fairseq's ``transformer`` model.

They are plain fairseq transformers, so a student decodes with stock ``fairseq-generate`` /
``fairseq-interactive`` (given ``--user-dir`` for the arch name and the task) and converts with
CTranslate2. Each size can still be overridden on the command line (``--decoder-layers`` ...).
"""
from fairseq.models import register_model_architecture
from fairseq.models.transformer.transformer_legacy import base_architecture


def _student(args, layers_enc, layers_dec, dim, heads, ffn):
    args.encoder_layers = getattr(args, "encoder_layers", layers_enc)
    args.decoder_layers = getattr(args, "decoder_layers", layers_dec)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", dim)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", dim)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", heads)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", heads)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", ffn)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", ffn)
    base_architecture(args)


@register_model_architecture("transformer", "transformer_student_iwslt")
def transformer_student_iwslt(args):
    """The ImitKD paper's IWSLT14 student: 2+2 layers, d=256, 4 heads, FFN 768."""
    _student(args, 2, 2, 256, 4, 768)


@register_model_architecture("transformer", "transformer_student_deep_shallow")
def transformer_student_deep_shallow(args):
    """Deep encoder, one-layer decoder (Kasai et al. 2021): the decoder is what runs once per token,
    so moving depth to the encoder buys most of the decoding speed at little cost in quality."""
    _student(args, 6, 1, 256, 4, 1024)


@register_model_architecture("transformer", "transformer_student_small")
def transformer_student_small(args):
    """d=128, 3 encoder + 1 decoder layers: several times cheaper to decode than a 3+3 d=256 teacher,
    whose cost is dominated by the output projection that d=128 halves."""
    _student(args, 3, 1, 128, 4, 512)


@register_model_architecture("transformer", "transformer_student_tiny")
def transformer_student_tiny(args):
    """For tests only: 1+1 layers, d=32."""
    _student(args, 1, 1, 32, 2, 64)
