"""Attacks: the PGD loop (`pgd.py`) apart from the threat models' step and projection (`threat_models.py`)."""
from trainers.attacks.pgd import AttackConfig, PGDAttacker, attack_mode
from trainers.attacks.threat_models import THREAT_MODELS, L2Threat, LinfThreat, ThreatModel

__all__ = ["AttackConfig", "PGDAttacker", "attack_mode", "THREAT_MODELS", "L2Threat", "LinfThreat",
           "ThreatModel"]
