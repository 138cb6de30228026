"""The web console: server-rendered pages (and their JSON twins under ``/api/``) over the node's database.

Modules: :mod:`.users` (local users, argon2), :mod:`.auth` (signed session cookies, CSRF, login rate
limit), :mod:`.data` (what each page shows, as plain data), :mod:`.images` (SR text, Secondary
Capture thumbnails), :mod:`.app` (routes), :mod:`.server` (uvicorn), :mod:`.cli` (``pacs-agent console``).

The console never imports torch or the pipelines: it reads the database and the stored result files.
"""
