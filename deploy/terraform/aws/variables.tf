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
  description = "Instance type for balancers and brokers."
  type        = string
  default     = "t3.small"
}

variable "client_cidrs" {
  description = "Who may connect to MQTT on 1883."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}
