"""The built-in registry entries: one line per student, teacher, loss term, target, student
transform and dataset. A new method is its own file plus one line here (or a `register`
call in your own code, before building)."""

from losses.attention import AttentionKLTerm, QKVRelationTerm
from losses.auxiliary import RouterAuxTerm
from losses.divergence import CrossEntropyTerm, LogitDivergenceTerm, MDistTerm
from losses.feature import FeatureTerm, LayerReplayTerm
from losses.relation import HiddenRelationTerm, RKDTerm, rdist_term
from losses.vision_align import BREENQueryTerm, EVEAlignmentTerm
from students.eagle import eagle_head
from students.encoder_free import breen_student, eve_student
from students.hybrid import check_hybrid_fits, hybrid_transform
from students.matformer import matformer_transform
from students.mod import check_mod_fits, check_mod_options, mod_transform
from students.quantize import check_quantize_fits, check_quantize_options, quantize_transform
from students.ternary import check_ternary_fits, check_ternary_options, ternary_transform
from students.vlm import llava_from_parts, tiny_llava, tiny_mmfree_llava
from teachers.hf_vlm import HFVLMTeacher
from teachers.timm_vit import TimmTeacher
from teachers.vision_encoder import VisionEncoderTeacher
from workbench.data import hf_dataset_splits, llava_splits, windtunnel_splits
from workbench.data.vision import digits_splits, image_folder_splits, windtunnel_classification_splits
from workbench.registry import DATASETS, LOSSES, STUDENTS, TARGETS, TEACHERS, TRANSFORMS
from workbench.targets.cached import CachedTeacher
from workbench.targets.none import NoTeacher
from workbench.targets.on_policy import OnPolicyTeacher
from workbench.targets.online import OnlineTeacher
from workbench.targets.vision import VisionFeatures

STUDENTS.register("tiny_llava", tiny_llava)
STUDENTS.register("llava_from_parts", llava_from_parts)
STUDENTS.register("tiny_mmfree_llava", tiny_mmfree_llava)  # the MatMul-free LM behind a CLIP tower
STUDENTS.register("eve", eve_student)
STUDENTS.register("breen", breen_student)
STUDENTS.register("eagle_head", eagle_head, from_teacher=True)  # a draft head on the teacher's features

TEACHERS.register("hf_vlm", HFVLMTeacher)
TEACHERS.register("timm", TimmTeacher)
TEACHERS.register("vision_encoder", VisionEncoderTeacher, feature_teacher=True)

LOSSES.register("ce", CrossEntropyTerm)
for _divergence in ("forward_kl", "reverse_kl", "jsd", "tvd", "soft_ce"):
    LOSSES.register(_divergence, LogitDivergenceTerm, preset={"divergence": _divergence})
LOSSES.register("mdist", MDistTerm)
LOSSES.register("rdist", rdist_term)
LOSSES.register("feature_mse", FeatureTerm, preset={"kind": "mse"})
LOSSES.register("feature_cosine", FeatureTerm, preset={"kind": "cosine"})
LOSSES.register("feature_smooth_l1", FeatureTerm, preset={"kind": "smooth_l1"})  # EAGLE draft heads
LOSSES.register("hidden_relation", HiddenRelationTerm)
LOSSES.register("rkd_distance", RKDTerm, preset={"kind": "distance"})
LOSSES.register("rkd_angle", RKDTerm, preset={"kind": "angle"})
LOSSES.register("attention_kl", AttentionKLTerm)
LOSSES.register("qkv_relation", QKVRelationTerm)
LOSSES.register("layer_replay", LayerReplayTerm)
LOSSES.register("eve_alignment", EVEAlignmentTerm)
LOSSES.register("breen_query", BREENQueryTerm)
LOSSES.register("mod_router", RouterAuxTerm)  # gamma-MoD: the router learns its own selection

TARGETS.register("none", NoTeacher)
TARGETS.register("online_teacher", OnlineTeacher)
TARGETS.register("on_policy", OnPolicyTeacher)  # the student answers, the teacher scores its tokens
TARGETS.register("cached_teacher", CachedTeacher)
TARGETS.register("vision_features", VisionFeatures)

# order: hybrid conversion before `init_from` (a converted stage's weights load by name), nesting and
# quantization-aware training after. check: the options that need no model, when a config loads;
# fits: the options against the first stage's model, for the later stages that start from it
TRANSFORMS.register("hybrid", hybrid_transform, order=10, fits=check_hybrid_fits)
TRANSFORMS.register("mod", mod_transform, order=20, check=check_mod_options,  # p-MoD: routers over image tokens
                    fits=check_mod_fits)  # weights keep their names
TRANSFORMS.register("matformer", matformer_transform, order=60)
TRANSFORMS.register("quantize", quantize_transform, order=70,  # fake quantization of the final structure
                    check=check_quantize_options, fits=check_quantize_fits)
TRANSFORMS.register("ternary", ternary_transform, order=70,  # BitNet b1.58 BitLinear layers
                    check=check_ternary_options, fits=check_ternary_fits)

DATASETS.register("llava", llava_splits)
DATASETS.register("hf_dataset", hf_dataset_splits)
DATASETS.register("windtunnel", windtunnel_splits)
DATASETS.register("image_folder", image_folder_splits)
DATASETS.register("digits", digits_splits)
DATASETS.register("windtunnel_classification", windtunnel_classification_splits)
