from .attention import MultiheadAttention, scaled_dot_product_attention
from .box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
)
from .dropout import dropout, dropout_add, ffn_hidden
from .mlp import MLP
from .ms_deform_attn import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_pytorch
from .position_encoding import (
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    sine_embed_coordinates,
)
from .transformer import (
    FeedForward,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    clone_layers,
    xavier_init_,
)
