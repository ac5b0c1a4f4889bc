"""One module per operation the ingress offers; each holds that operation's rules.

Routes (serve_app.routes) and the AMQP door only translate their protocol to and from these calls.
"""
