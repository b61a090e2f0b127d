"""Typed application state."""

from aiohttp import web

from api.admission import Admission
from api.auth import Gate, Principal
from api.batchlane import Batches
from api.limits import Limiter
from api.models import ModelCatalog
from api.replies import ReplyRouter
from api.submit import SubmitBatcher
from api.validation import BodyChecker
from api.waiters import JobWaiters
from api.webhooks import WebhookDirectory
from shared.broker import Broker
from shared.keystore import KeyStore
from shared.metrics import Metrics
from shared.providers import Providers
from shared.settings import Settings
from shared.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BROKER = web.AppKey("broker", Broker)
REPLIES = web.AppKey("replies", ReplyRouter)
PROVIDERS = web.AppKey("providers", Providers)
METRICS = web.AppKey("metrics", Metrics)
SUBMITS = web.AppKey("submits", SubmitBatcher)
CHECKER = web.AppKey("checker", BodyChecker)
ADMISSION = web.AppKey("admission", Admission)
CATALOG = web.AppKey("catalog", ModelCatalog)
GATE = web.AppKey("gate", Gate)
LIMITER = web.AppKey("limiter", Limiter)
KEYSTORE = web.AppKey("keystore", KeyStore)
WAITERS = web.AppKey("waiters", JobWaiters)
BATCHES = web.AppKey("batches", Batches)
WEBHOOKS = web.AppKey("webhooks", WebhookDirectory)

# Per-request facts the handlers leave for the middleware (metrics, logs, the id headers).
REQUEST_ID_KEY = web.RequestKey("request_id", str)
MODE = web.RequestKey("mode", str)
MODEL = web.RequestKey("model", str)
PROVIDER_SECONDS = web.RequestKey("provider_seconds", float)
PRINCIPAL = web.RequestKey("principal", Principal)
