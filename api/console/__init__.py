"""The operator console (`/console`, issue 20): server-rendered pages over what `GET /status`
reads, the bounded task lists, and three actions (retry, cancel a task, cancel a batch).

routes.py assembles the router; pages.py and actions.py are its GET and POST halves; auth.py
the roles, sessions and CSRF tokens; csp.py the headers every answer carries; task_list.py the
lists; charts.py the SVG charts; render.py the templates. Nothing here imports at package level,
so `api.console.auth` is cheap to import for api/deps.py.
"""
