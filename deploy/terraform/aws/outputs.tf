output "mqtt_endpoint" {
  description = "Point clients here (port 1883)."
  value       = aws_lb.mqtt.dns_name
}

output "node_ips" {
  description = "Private addresses of the cluster's nodes (n1, n2, n3)."
  value       = aws_network_interface.node[*].private_ip
}
