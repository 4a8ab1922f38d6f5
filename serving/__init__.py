"""The Ray Serve application: OpenAI-compatible HTTP API in front of raytrain-trained models.

Modules: `config` (what `build_app` accepts), `api` (wire models and errors), `engine` (generation
backends), `service` (request handling), `app` (the Serve deployment and `build_app`). Nothing is imported
here, so `import serving.config` stays free of torch and Ray.
"""
