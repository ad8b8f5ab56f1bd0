"""Local web viewers: ``meshhealth provider serve`` and ``meshhealth patient serve``.

Each runs a small aiohttp server on the reader's own machine (loopback by
default).  Every byte it shows has been fetched, verified and decrypted in
that server process with the reader's key, through ``sharing/provider.py``;
the page only asks it for JSON and draws it with ``web/static/chart.js``.

* ``windows``: pure: time windows (grant bands, unavailable gaps), the JSON
  shapes of grants and series;
* ``server``: the shell both share: static files, security headers, the
  reader's session and verifier pool, ``/api/series``, listening and printing
  the URL;
* ``provider_view`` / ``patient_view``: each one's routes.
"""
