"""The web console under ``/console`` in the gateway: acceptance, A/B, versions and rollout, loop, training, data.

``mount_console(app, params)`` adds it to a gateway built by :func:`feedback.app.create_app`. Pages are
server-rendered (Jinja2 templates in ``templates/``); charts use uPlot, pinned in the repository's
``package.json``/``package-lock.json`` and vendored into ``static/vendor/`` by ``make console-assets``
(committed, so serving needs no Node and no network).
"""

from feedback.console.routes import mount as mount_console

__all__ = ["mount_console"]
