# Two mqlb balancers behind a plain TCP network load balancer, three brokers
# behind them. The NLB's health check is `mqlb healthcheck`'s HTTP endpoint
# on each balancer: it answers 200 only while an MQTT client gets through
# that balancer to a broker (CONNECT/CONNACK, PINGREQ/PINGRESP). A static
# nginx "health page" keeps answering 200 while the brokers are hung.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

locals {
  broker_names = ["broker-1", "broker-2", "broker-3"]
}

resource "aws_security_group" "mqtt" {
  name_prefix = "mqlb-"
  vpc_id      = var.vpc_id

  ingress {
    description = "MQTT from clients and the NLB"
    from_port   = 1883
    to_port     = 1883
    protocol    = "tcp"
    cidr_blocks = var.client_cidrs
  }

  ingress {
    description = "Health endpoint for the NLB"
    from_port   = 8080
    to_port     = 8080
    protocol    = "tcp"
    self        = true
    cidr_blocks = ["10.0.0.0/8"]
  }

  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_instance" "broker" {
  count                  = length(local.broker_names)
  ami                    = var.ami_id
  instance_type          = var.instance_type
  subnet_id              = element(var.subnet_ids, count.index)
  vpc_security_group_ids = [aws_security_group.mqtt.id]
  user_data              = <<-EOT
    #!/bin/sh
    set -e
    apt-get update && apt-get install -y mosquitto
    printf 'listener 1883 0.0.0.0\nallow_anonymous true\n' > /etc/mosquitto/conf.d/mqlb.conf
    systemctl restart mosquitto
  EOT
  tags = {
    Name = local.broker_names[count.index]
  }
}

resource "aws_instance" "balancer" {
  count                  = 2
  ami                    = var.ami_id
  instance_type          = var.instance_type
  subnet_id              = element(var.subnet_ids, count.index)
  vpc_security_group_ids = [aws_security_group.mqtt.id]
  user_data = templatefile("${path.module}/balancer-init.sh.tftpl", {
    package_url = var.mqlb_package_url
    brokers     = aws_instance.broker[*].private_ip
  })
  tags = {
    Name = "mqlb-${count.index + 1}"
  }
}

resource "aws_lb" "mqtt" {
  name               = "mqlb"
  load_balancer_type = "network"
  subnets            = var.subnet_ids
}

resource "aws_lb_target_group" "balancers" {
  name     = "mqlb-balancers"
  port     = 1883
  protocol = "TCP"
  vpc_id   = var.vpc_id

  health_check {
    protocol            = "HTTP"
    port                = "8080"
    path                = "/health"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }
}

resource "aws_lb_target_group_attachment" "balancer" {
  count            = length(aws_instance.balancer)
  target_group_arn = aws_lb_target_group.balancers.arn
  target_id        = aws_instance.balancer[count.index].id
  port             = 1883
}

resource "aws_lb_listener" "mqtt" {
  load_balancer_arn = aws_lb.mqtt.arn
  port              = 1883
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.balancers.arn
  }
}
