"""Few-shot learners behind one interface, registered by name."""

from fewshot.learners.base import Learner, create_learner, learner_class, list_learners, register_learner
from fewshot.learners.baseline import Baseline, BaselinePP
from fewshot.learners.maml import MAML
from fewshot.learners.matchingnet import MatchingNet
from fewshot.learners.protonet import ProtoNet
from fewshot.learners.relationnet import RelationNet

__all__ = [
    "Learner",
    "MAML",
    "ProtoNet",
    "MatchingNet",
    "RelationNet",
    "Baseline",
    "BaselinePP",
    "create_learner",
    "learner_class",
    "list_learners",
    "register_learner",
]
