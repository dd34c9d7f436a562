variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "vpc_id" {
  description = "VPC to run in."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets (two or more zones) for the load balancer and instances."
  type        = list(string)
}

variable "ami_id" {
  description = "A Debian 12 image."
  type        = string
}

variable "mqlb_package_url" {
  description = "Where instances download the mqlb binary (your artifact store)."
  type        = string
}

variable "instance_type" {
  description = "Instance type for balancers and nodes."
  type        = string
  default     = "t3.small"
}

variable "client_cidrs" {
  description = "Who may connect to MQTT on 1883."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "name" {
  description = "Name of the deployment: the NLB, the instances' tags and the SSM parameter prefix."
  type        = string
  default     = "mqlb"
}

variable "cluster_tls_dir" {
  description = "Directory with ca.pem and n1.pem/n1.key, n2..., n3... made by `mqlb cert create-ca --out DIR` and `mqlb cert create-node nN --ca DIR --out DIR`."
  type        = string
}

variable "password_file" {
  description = "The clients' password file (mosquitto_passwd format, or `echo secret | mqlb passwd alice`): the nodes take no anonymous clients."
  type        = string
}
