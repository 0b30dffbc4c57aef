"""The web client (HTML, JS, CSS, translations), shipped inside the package as data.

A package only so that an installed sfumesh finds these files with `importlib.resources`
(`node.web.app` serves them); there is no Python code here.
"""
