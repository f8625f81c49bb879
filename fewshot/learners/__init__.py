"""Few-shot learners behind one interface, registered by name."""
from fewshot.learners.base import Learner, create_learner, list_learners, register_learner

__all__ = ["Learner", "create_learner", "list_learners", "register_learner"]
