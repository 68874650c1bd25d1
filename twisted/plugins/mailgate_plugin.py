# The twistd plugin: `twistd -n mailgate --config /etc/mailgate/mailgate.toml`.
# Lazy: nothing of the gateway is imported until the plugin is used.
from twisted.application.service import ServiceMaker

mailgate = ServiceMaker(
    "MailGate", "gateway.tap", "A bastion mail gateway: SMTP in, filters, durable queue, delivery.", "mailgate"
)
