"""The gateway: the public, OpenAI-compatible HTTP API in front of the encoder and LM tiers.

Layers, each in its own module: ``router`` (HTTP only) → ``protocol`` (schemas) →
``serving`` / ``serving_chat`` / ``serving_captions`` (orchestration) → clients for the
downstream tiers (``encoder_client``, ``encoder_kserve``, ``lm_client``) over endpoint
``pool``\\ s, with the feature ``cache`` in between. Imports ``proto`` and
``services.common`` only — never model code.
"""

from services.gateway.app import GatewayState, Transports, create_app
from services.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "GatewayState", "Transports", "create_app"]
