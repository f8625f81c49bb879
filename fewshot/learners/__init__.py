"""Few-shot learners behind one interface, registered by name."""
from fewshot.learners.base import Learner, create_learner, list_learners, register_learner
from fewshot.learners.maml import MAML

__all__ = ["Learner", "MAML", "create_learner", "list_learners", "register_learner"]
