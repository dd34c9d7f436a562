# The bundled cluster on AWS: three `mqlb broker` nodes (mutual TLS between
# them), two mqlb balancers in front of them, and a plain TCP network load
# balancer in front of the balancers. The NLB's health check is `mqlb
# healthcheck`'s HTTP endpoint on each balancer: 200 only while an MQTT
# client gets through that balancer to a node.
#
# Secrets (the nodes' certificates and keys, the admin token, the client
# password file) go to SSM Parameter Store as SecureStrings, which each
# instance reads at boot through its role: not in user data, which anyone
# with ec2:DescribeInstanceAttribute can read. They are in Terraform's
# state, like every secret Terraform manages: keep the state encrypted.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
}

provider "aws" {
  region = var.region
}

data "aws_vpc" "this" {
  id = var.vpc_id
}

locals {
  nodes = ["n1", "n2", "n3"]
  # What every node's configuration shares; the rest is per node.
  prefix = "/${var.name}"
}

# The nodes' addresses exist before the nodes, so each node's peers can be
# written into its configuration.
resource "aws_network_interface" "node" {
  count           = length(local.nodes)
  subnet_id       = element(var.subnet_ids, count.index)
  security_groups = [aws_security_group.node.id]
  tags = {
    Name = "${var.name}-${local.nodes[count.index]}"
  }
}

resource "random_password" "admin_token" {
  length  = 43
  special = false
}

resource "aws_ssm_parameter" "admin_token" {
  name  = "${local.prefix}/admin-token"
  type  = "SecureString"
  value = random_password.admin_token.result
}

# The balancers' health probes log in as mqlb-probe (the nodes take no
# anonymous clients).
resource "random_password" "probe" {
  length  = 32
  special = false
}

resource "aws_ssm_parameter" "probe_password" {
  name  = "${local.prefix}/probe-password"
  type  = "SecureString"
  value = random_password.probe.result
}

resource "aws_ssm_parameter" "passwd" {
  name  = "${local.prefix}/passwd"
  type  = "SecureString"
  value = file(var.password_file)
}

resource "aws_ssm_parameter" "cluster_ca" {
  name  = "${local.prefix}/cluster-ca.pem"
  type  = "SecureString"
  value = file("${var.cluster_tls_dir}/ca.pem")
}

resource "aws_ssm_parameter" "node_cert" {
  count = length(local.nodes)
  name  = "${local.prefix}/${local.nodes[count.index]}/cluster.pem"
  type  = "SecureString"
  value = file("${var.cluster_tls_dir}/${local.nodes[count.index]}.pem")
}

resource "aws_ssm_parameter" "node_key" {
  count = length(local.nodes)
  name  = "${local.prefix}/${local.nodes[count.index]}/cluster.key"
  type  = "SecureString"
  value = file("${var.cluster_tls_dir}/${local.nodes[count.index]}.key")
}

# Instances read their parameters, and only theirs.
resource "aws_iam_role" "instance" {
  name_prefix = "${var.name}-"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy" "read_parameters" {
  role = aws_iam_role.instance.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = ["ssm:GetParameter"]
      Resource = "arn:aws:ssm:${var.region}:*:parameter${local.prefix}/*"
    }]
  })
}

resource "aws_iam_instance_profile" "instance" {
  name_prefix = "${var.name}-"
  role        = aws_iam_role.instance.name
}

# Clients reach the balancers (and the NLB checks their health endpoint);
# only the balancers reach the nodes' MQTT and admin ports; only the nodes
# reach each other's cluster port.
resource "aws_security_group" "balancer" {
  name_prefix = "${var.name}-balancer-"
  vpc_id      = var.vpc_id

  ingress {
    description = "MQTT from clients (the NLB keeps their addresses)"
    from_port   = 1883
    to_port     = 1883
    protocol    = "tcp"
    cidr_blocks = var.client_cidrs
  }

  ingress {
    description = "Health endpoint, checked by the NLB from inside the VPC"
    from_port   = 8080
    to_port     = 8080
    protocol    = "tcp"
    cidr_blocks = [data.aws_vpc.this.cidr_block]
  }

  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "node" {
  name_prefix = "${var.name}-node-"
  vpc_id      = var.vpc_id

  ingress {
    description     = "MQTT from the balancers"
    from_port       = 1883
    to_port         = 1883
    protocol        = "tcp"
    security_groups = [aws_security_group.balancer.id]
  }

  ingress {
    description     = "Admin API (/cluster, /readyz) from the balancers"
    from_port       = 9101
    to_port         = 9101
    protocol        = "tcp"
    security_groups = [aws_security_group.balancer.id]
  }

  ingress {
    description = "Cluster links (mutual TLS) between the nodes"
    from_port   = 7000
    to_port     = 7000
    protocol    = "tcp"
    self        = true
  }

  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_instance" "node" {
  count                = length(local.nodes)
  ami                  = var.ami_id
  instance_type        = var.instance_type
  iam_instance_profile = aws_iam_instance_profile.instance.name

  network_interface {
    network_interface_id = aws_network_interface.node[count.index].id
    device_index         = 0
  }

  user_data = templatefile("${path.module}/node-init.sh.tftpl", {
    package_url = var.mqlb_package_url
    region      = var.region
    prefix      = local.prefix
    node        = local.nodes[count.index]
    ip          = aws_network_interface.node[count.index].private_ip
    peers = [
      for i, n in local.nodes : "${n}@${aws_network_interface.node[i].private_ip}:7000"
      if i != count.index
    ]
    unit = file("${path.module}/../../systemd/mqlb-broker.service")
  })

  tags = {
    Name = "${var.name}-${local.nodes[count.index]}"
  }
}

resource "aws_instance" "balancer" {
  count                  = 2
  ami                    = var.ami_id
  instance_type          = var.instance_type
  subnet_id              = element(var.subnet_ids, count.index)
  vpc_security_group_ids = [aws_security_group.balancer.id]
  iam_instance_profile   = aws_iam_instance_profile.instance.name

  user_data = templatefile("${path.module}/balancer-init.sh.tftpl", {
    package_url = var.mqlb_package_url
    region      = var.region
    prefix      = local.prefix
    nodes       = local.nodes
    ips         = aws_network_interface.node[*].private_ip
    unit        = file("${path.module}/../../systemd/mqlb.service")
  })

  tags = {
    Name = "${var.name}-balancer-${count.index + 1}"
  }
}

resource "aws_lb" "mqtt" {
  name               = var.name
  load_balancer_type = "network"
  subnets            = var.subnet_ids
}

resource "aws_lb_target_group" "balancers" {
  name     = "${var.name}-balancers"
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
