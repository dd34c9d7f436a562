output "mqtt_endpoint" {
  description = "Point clients here (port 1883)."
  value       = aws_lb.mqtt.dns_name
}

output "broker_ips" {
  description = "Private addresses of the brokers."
  value       = aws_instance.broker[*].private_ip
}
