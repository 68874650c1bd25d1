"""Operating the gateway: the control socket."""
