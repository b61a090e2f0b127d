"""Typed application state."""

from aiohttp import web

from api.replies import ReplyRouter
from shared.broker import Broker
from shared.settings import Settings
from shared.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BROKER = web.AppKey("broker", Broker)
REPLIES = web.AppKey("replies", ReplyRouter)
